"""The real-data comparison report: Med-CAM (fast and reference) against the Grad-CAM family (and
PatchNet saliency with its own classifier), on a test split with lesion masks.

    python benchmarks/evaluate.py --dataset brain_mri --data ../shared/data/brain_mri \
        --classifier brain_mri_mobilenetv2 --n 100 --out benchmarks/results/evaluation_brain_mri
    python benchmarks/evaluate.py --dataset isic2018 --data ../shared/data/isic2018 \
        --classifier isic2018_mobilenetv2 --weights-dir benchmarks/models --n 100 \
        --out benchmarks/results/evaluation_isic2018
    python benchmarks/evaluate.py --dataset brain_mri_tag --data ../shared/data/brain_mri \
        --classifier brain_mri_tag_mobilenetv2 --weights-dir benchmarks/models --n 60 \
        --out benchmarks/results/evaluation_brain_mri_tag

Same as ``medcam-fast evaluate``. Resumable: rerun the same command after an interruption.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcam_fast.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
