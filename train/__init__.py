"""Pre-training on 1p-frac shards (LIEP images, LPCE loss) and fine-tuning on downstream data sets.

`python -m train.pretrain --help` and `python -m train.finetune --help` are the entry points.
"""
