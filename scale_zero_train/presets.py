"""The paper's recipe per model size (docs/algorithm.md, "The paper's setup"), as defaults for
the trainer. The global batch is fixed at 512 sequences: resolution derives gradient
accumulation = global / (micro batch x data-parallel ranks), so the recipe is the same on 8
or 64 GPUs. A preset only overrides the defaults of scale_zero_train.config's fields; every
flag overrides it."""

# Every size: 512 x 256 tokens per step, cosine with 10% linear warmup from 0 to a 0.1x
# floor, no weight decay, output-layer momentum 0.9.
RECIPE = dict(seq_len=256, global_batch_size=512, warmup_ratio=0.1, min_lr_ratio=0.1, weight_decay=0.0, momentum=0.9)

# SCALE's lr (matrices, embedding, output layer), the 1-D parameters' AdamW lr, steps; for
# the paper's sizes (scale_zero_train.vocab.MODEL_SIZES but tiny).
SIZES = {
    "60m": dict(lr=1e-3, adam_lr=2e-2, steps=11_000),
    "130m": dict(lr=1e-3, adam_lr=2e-2, steps=20_000),
    "350m": dict(lr=1e-3, adam_lr=2e-2, steps=60_000),
    "1b": dict(lr=2e-4, adam_lr=1e-3, steps=100_000),
    "7b": dict(lr=1e-4, adam_lr=1e-3, steps=150_000),
}


def preset(size: str) -> dict:
    """Field defaults (scale_zero_train.config) for `scale_zero_train.train.main(preset=...)`."""
    return {"model": size, **RECIPE, **SIZES[size]}
