"""MARBLE-style probing of frozen MERT models (thesis 3.5.2, App. A.2) and token-level
culture similarity (thesis 4.3).

- `tasks`: the six tagging datasets on their published splits, and generic CSV task files;
- `chunking`: the 30 s sliding windows, the per-dataset duration cut, waveform normalisation;
- `features`: frozen-model extraction of every layer's mean-pooled chunk features into a cache;
- `metrics`: per-track aggregation and the scikit-learn tagging metrics;
- `probe`: the MLP probe, its learning-rate selection on validation and its seeds;
- `runs`: probe runs for reports: loading, naming by content, the best layer per cell, its uncertainty;
- `tag_groups`: the cells of tags named ``group=value``, scored group by group;
- `tables`, `figures`: Tables 4.1/4.2 and the probing figures, for ``probe.py report`` and the experiment;
- `report`: the report of ``probe.py report``;
- `token_similarity`: code histograms, Jensen-Shannon divergence and cosine distance;
- `semantic_tokens`: k-means "semantic tokens" of one layer's frame features.
"""
