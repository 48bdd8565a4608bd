"""Criterion ``mert_mlm``: MERT's masked acoustic and musical prediction loss (thesis 3.2).

On the masked, non-padding frames t of a batch (summed; fairseq divides by their number):

    L = alpha * sum_t sum_k CE(cos(W_k h_t, e_k) / 0.1, code_{t,k})      acoustic, eq. 3.1-3.2
      + beta  * sum_t mean_b (cqt_pred_{t,b} - cqt_{t,b})^2                musical, eq. 3.3
      + gamma * n_masked * mean(conv features^2)                          release's penalty

alpha = 10, beta = 1, gamma = 0 are the thesis's weights; the MERT release uses alpha = 1,
beta = 1, gamma = 10. The softmax runs over every row of a codebook's block of codewords
(1,024 codes and the 4 dictionary symbols of the release), as fairseq's ``compute_nce`` does.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class MertMlmConfig(FairseqDataclass):
    acoustic_weight: float = field(default=10.0, metadata={"help": "alpha: weight of the EnCodec NCE"})
    musical_weight: float = field(default=1.0, metadata={"help": "beta: weight of the CQT MSE"})
    feature_penalty_weight: float = field(
        default=0.0, metadata={"help": "gamma: weight of the conv-feature L2 penalty (release: 10)"}
    )
    codebooks_per_batch: int = field(
        default=0,
        metadata={"help": "predict this many randomly chosen codebooks per batch (0: all; Table 4.4)"},
    )


@register_criterion("mert_mlm", dataclass=MertMlmConfig)
class MertMlmCriterion(FairseqCriterion):
    def __init__(self, cfg: MertMlmConfig, task):
        super().__init__(task)
        self.cfg = cfg

    def forward(self, model, sample: dict, reduce: bool = True):
        """``sample`` holds ``net_input``, ``codes`` [B, T', K] and ``cqt`` [B, T'', bins] with
        T', T'' >= the model's frames T (extra trailing target frames are dropped)."""
        out = model(**sample["net_input"], mask=True)
        masked = out["mask_indices"]
        frames = masked.shape[1]
        hidden = out["x"][masked]
        codes = sample["codes"][:, :frames][masked]
        cqt = sample["cqt"][:, :frames][masked]

        logits = model.codeword_logits(hidden)
        rows = codes + model.cfg.num_special_symbols
        num_codebooks = logits.shape[1]
        chosen = torch.arange(num_codebooks, device=logits.device)
        if 0 < self.cfg.codebooks_per_batch < num_codebooks:
            chosen = torch.randperm(num_codebooks, device=logits.device)[: self.cfg.codebooks_per_batch]
            chosen = chosen.sort().values
        logits, rows = logits[:, chosen], rows[:, chosen]
        per_codebook = F.cross_entropy(logits.transpose(1, 2), rows, reduction="none").sum(dim=0)
        correct = (logits.argmax(dim=-1) == rows).sum(dim=0)
        acoustic = per_codebook.sum()

        logging_output = {"sample_size": int(masked.sum()), "nsentences": masked.shape[0]}
        for k, loss_k, correct_k in zip(chosen.tolist(), per_codebook.tolist(), correct.tolist()):
            logging_output[f"loss_codebook_{k}"] = loss_k
            logging_output[f"correct_codebook_{k}"] = correct_k
            logging_output[f"count_codebook_{k}"] = len(rows)
        musical = F.mse_loss(model.cqt_prediction(hidden).float(), cqt.float(), reduction="none")
        musical = musical.mean(dim=-1).sum()
        penalty = out["features_pen"] * logging_output["sample_size"]

        loss = (
            self.cfg.acoustic_weight * acoustic
            + self.cfg.musical_weight * musical
            + self.cfg.feature_penalty_weight * penalty
        )
        logging_output.update(
            loss=loss.item(),
            loss_acoustic=acoustic.item(),
            loss_cqt=musical.item(),
            features_pen=penalty.item(),
        )
        return loss, logging_output["sample_size"], logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict]) -> None:
        """Per masked frame, in nats: total, acoustic (summed over codebooks), CQT, each
        codebook's loss and accuracy."""
        sample_size = max(sum(log.get("sample_size", 0) for log in logging_outputs), 1)
        for name in ("loss", "loss_acoustic", "loss_cqt", "features_pen"):
            total = sum(log.get(name, 0.0) for log in logging_outputs)
            metrics.log_scalar(name, total / sample_size, sample_size, round=4)
        keys = {key for log in logging_outputs for key in log if key.startswith("loss_codebook_")}
        for key in sorted(keys):
            k = key.rsplit("_", 1)[1]
            count = sum(log.get(f"count_codebook_{k}", 0) for log in logging_outputs)
            if count == 0:
                continue
            loss = sum(log.get(key, 0.0) for log in logging_outputs)
            correct = sum(log.get(f"correct_codebook_{k}", 0) for log in logging_outputs)
            metrics.log_scalar(f"loss_cb{k}", loss / count, count, round=4)
            metrics.log_scalar(f"acc_cb{k}", correct / count, count, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
