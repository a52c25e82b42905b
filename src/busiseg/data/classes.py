"""The class names, written once: BUSI's three folders, and the two a mask alone can tell."""

TUMOUR_CLASSES = ("benign", "malignant")  # each gets its own Dice key (dice_benign, ...)
CLASSES = (*TUMOUR_CLASSES, "normal")  # BUSI's class folders
# data.classes: none labels each case by its mask alone: "lesion" or "normal"
ALL_CLASSES = (*TUMOUR_CLASSES, "lesion", "normal")
LESION_CLASSES = (*TUMOUR_CLASSES, "lesion")
