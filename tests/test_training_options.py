"""Memory-lean training options: activation checkpointing and bfloat16 autocast (issue 15).

Each option is compared with the default training step on the same weights, batch and RNG
state: checkpointing must give the same loss and gradients (the recomputation replays the
dropout masks), bfloat16 autocast the same within bfloat16's precision.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from omegaconf import OmegaConf

from culturemert.criterions.mert_mlm import MertMlmConfig, MertMlmCriterion
from culturemert.errors import UserError
from culturemert.models.mert import MertModel
from culturemert.tasks.mert_cpt import MertCptConfig, MertCptTask

STAGE1 = r"feature_extractor\..*,label_embs_concat"


def batch(samples: int = 24_000, clips: int = 2) -> dict:
    generator = torch.Generator().manual_seed(3)
    frames = samples // 320
    return {
        "net_input": {
            "source": torch.randn(clips, samples, generator=generator) * 0.1,
            "padding_mask": torch.arange(samples)[None, :]
            >= torch.tensor([samples, samples - 4_000])[:, None],
        },
        "codes": torch.randint(0, 1024, (clips, frames, 8), generator=generator),
    }


class BackwardOnly:
    """The part of fairseq's optimizer that ``FairseqTask.train_step`` calls."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def train_step(task_cfg: MertCptConfig, model: MertModel) -> tuple[torch.Tensor, dict, dict]:
    """One ``mert_cpt`` training step from RNG seed 5: the loss, the logging output and the
    gradients of the trainable parameters (zeros where layerdrop skipped a layer)."""
    task = MertCptTask(task_cfg)
    task.freeze_for_stage(model)
    criterion = MertMlmCriterion(MertMlmConfig(), task)
    torch.manual_seed(5)
    loss, _, logs = task.train_step(batch(), model, criterion, BackwardOnly(), update_num=0)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in trainable}
    return loss.detach(), logs, grads


def task_config(**fields) -> MertCptConfig:
    return MertCptConfig(data="unused", tokens="cached", seed=1, **fields)


@pytest.mark.parametrize("trainable", [".*", STAGE1], ids=["stage2", "stage1-frozen-transformer"])
@pytest.mark.parametrize("layer_norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(trainable, layer_norm_first, one_thread):
    """Dropout everywhere and layerdrop 0.5 (4 layers): the recomputed forward must redraw the same
    dropout masks, and the layers skipped must be the same ones."""
    cfg = dict(
        layer_norm_first=layer_norm_first, encoder_layers=4, encoder_layerdrop=0.5, activation_dropout=0.1
    )
    torch.manual_seed(0)
    weights = MertModel(tiny_config(**cfg)).state_dict()
    results, layers_run = [], []
    for checkpointing in (False, True):
        model = MertModel(tiny_config(**cfg, checkpoint_activations=checkpointing)).train()
        model.load_state_dict(weights)
        ran = set()  # a recomputation runs a layer again: a set counts it once
        for index, layer in enumerate(model.encoder.layers):
            layer.register_forward_hook(lambda *_, index=index, ran=ran: ran.add(index))
        results.append(train_step(task_config(trainable=trainable), model))
        layers_run.append(ran)
    assert 0 < len(layers_run[0]) < 4 and layers_run[1] == layers_run[0]  # layerdrop skipped the same
    (loss, logs, grads), (loss_ckpt, logs_ckpt, grads_ckpt) = results
    assert torch.isfinite(loss) and loss_ckpt.item() == loss.item()
    assert logs_ckpt["sample_size"] == logs["sample_size"]
    assert grads.keys() == grads_ckpt.keys()
    if trainable == STAGE1:
        assert not any(name.startswith("encoder.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    assert any(grad.abs().sum() > 0 for name, grad in grads.items() if name.startswith("feature_extractor."))


def saved_activation_bytes(model: MertModel, sample: dict) -> int:
    """Bytes of the distinct tensors that autograd keeps for the backward pass of the loss."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    criterion = MertMlmCriterion(MertMlmConfig(), task=None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _, _ = criterion(model, sample)
    loss.backward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_activation_checkpointing_keeps_fewer_activations(one_thread):
    """What it saves: of the blocks, only each one's input stays alive between forward and
    backward. What remains is mostly the loss heads' (8 x 1,028 logits per masked frame), so the
    transformer is made 4 layers x 128 wide here for the blocks to weigh as in the real model."""
    sample = batch()
    sample["cqt"] = torch.rand(2, 80, 336)
    shape = dict(encoder_layers=4, encoder_embed_dim=128, encoder_ffn_embed_dim=512, encoder_layerdrop=0.0)
    kept = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MertModel(tiny_config(**shape, checkpoint_activations=checkpointing)).train()
        kept[checkpointing] = saved_activation_bytes(model, sample)
    assert kept[True] < kept[False] / 2


def test_bf16_autocast_matches_float32_within_bfloat16_precision(one_thread):
    """bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 0.2 % per operation); summed
    over a 2-layer model's operations (measured: loss 3e-5, gradients at most 3 % relative) the
    loss stays within 0.1 %, each gradient tensor within 5 % of its norm, its direction kept
    (cosine > 0.999). The loss heads' outputs stay float32."""
    torch.manual_seed(0)
    weights = MertModel(tiny_config()).state_dict()
    results, dtypes = [], []
    for bf16 in (False, True):
        model = MertModel(tiny_config()).train()
        model.load_state_dict(weights)
        seen = {}
        codeword_logits, cqt_prediction = model.codeword_logits, model.cqt_prediction

        def logits_probe(x, seen=seen, original=codeword_logits):
            logits = original(x)
            seen.update(hidden=x.dtype, logits=logits.dtype)
            return logits

        def cqt_probe(x, seen=seen, original=cqt_prediction):
            prediction = original(x)
            seen.update(cqt_prediction=prediction.dtype)
            return prediction

        model.codeword_logits, model.cqt_prediction = logits_probe, cqt_probe
        results.append(train_step(task_config(bf16_autocast=bf16), model))
        dtypes.append(seen)
    (loss, _, grads), (loss_bf16, _, grads_bf16) = results
    assert dtypes[0] == {"hidden": torch.float32, "logits": torch.float32, "cqt_prediction": torch.float32}
    assert dtypes[1] == {"hidden": torch.bfloat16, "logits": torch.float32, "cqt_prediction": torch.float32}
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss.item(), rel=1e-3)
    for name, grad in grads.items():
        other = grads_bf16[name]
        assert other.dtype == torch.float32, name
        if name.endswith("k_proj.bias"):
            continue  # exactly 0: softmax ignores a shift shared by all keys; both hold rounding only
        assert (other - grad).norm() <= 0.05 * grad.norm(), name
        assert torch.nn.functional.cosine_similarity(other.flatten(), grad.flatten(), dim=0) > 0.999, name


@pytest.mark.parametrize("mixed", ["fp16", "amp", "bf16"])
def test_bf16_autocast_refuses_fairseq_mixed_precision(mixed):
    """Composed as Hydra does it: the task reads common.fp16/amp/bf16 through interpolation."""
    common = {"fp16": False, "amp": False, "bf16": False, "seed": 1}
    common[mixed] = True
    cfg = OmegaConf.create({"common": common, "task": OmegaConf.structured(task_config(bf16_autocast=True))})
    with pytest.raises(
        UserError, match=rf"task.bf16_autocast=true and common.{mixed}=true exclude each other"
    ):
        MertCptTask(cfg.task)
    common[mixed] = False
    cfg = OmegaConf.create({"common": common, "task": OmegaConf.structured(task_config(bf16_autocast=True))})
    assert MertCptTask(cfg.task).cfg.bf16_autocast
