"""busiseg: breast-ultrasound lesion segmentation, run through DVC."""
__version__ = "0.1.0"
