"""Pre-training on 1p-frac shards (LIEP images, LPCE loss) and fine-tuning on downstream data sets.

`fracgen-train pretrain --help` and `fracgen-train finetune --help` are the entry points.
"""
