"""The competition's fixed facts. Every module takes target order and weights from here."""
from __future__ import annotations

# The order of the five targets everywhere: model outputs, scalers, arrays, tables.
TARGETS: tuple[str, ...] = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
# The competition metric's per-row weights, in TARGETS order.
TARGET_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.1, 0.2, 0.5)
# The tabular inputs the main model fuses; absent from Kaggle's test.csv.
TABULAR: tuple[str, ...] = ("Pre_GSHH_NDVI", "Height_Ave_cm")

TRAIN_COLUMNS: tuple[str, ...] = (
    "sample_id", "image_path", "Sampling_Date", "State", "Species",
    "Pre_GSHH_NDVI", "Height_Ave_cm", "target_name", "target",
)
TEST_COLUMNS: tuple[str, ...] = ("sample_id", "image_path", "target_name")
# Per-image metadata columns carried into the wide table.
META: tuple[str, ...] = ("Sampling_Date", "State", "Species")

# Short column headers for tables, so they fit an 80-column terminal.
SHORT = {"Dry_Green_g": "Green", "Dry_Dead_g": "Dead", "Dry_Clover_g": "Clover", "GDM_g": "GDM",
         "Dry_Total_g": "Total", "Pre_GSHH_NDVI": "NDVI", "Height_Ave_cm": "Height"}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def sample_id(image_id: str, target: str) -> str:
    """Kaggle's row key: `ID1011485656__Dry_Clover_g`."""
    return f"{image_id}__{target}"
