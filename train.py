"""Train, validate, test or predict with a tlmodules recipe.

python train.py fit --config configs/digits_finetune.yaml
python train.py fit --config configs/minilm_finetune.yaml --data.init_args.train_file my.tsv
python train.py fit --config configs/digits_finetune.yaml --print_config
python train.py export --ckpt_path runs/tlmodules/version_0/checkpoints/last.ckpt --format onnx --output export/
"""

from tlmodules.cli import main

if __name__ == "__main__":
    main()
