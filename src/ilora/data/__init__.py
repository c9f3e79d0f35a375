"""Datasets: the in-memory representation, readers, candidate sets."""

from ilora.data.candidates import candidate_sets, load_candidates, save_candidates
from ilora.data.dataset import SPLITS, Catalog, SeqDataset, Split, validate_split
from ilora.data.io import detect_format, load_dataset
from ilora.data.native import read_native, write_native
from ilora.data.stats import dataset_stats
from ilora.data.synthetic import SynthConfig, make_synthetic, synthetic_from_config

__all__ = [
    "SPLITS",
    "Catalog",
    "SeqDataset",
    "Split",
    "SynthConfig",
    "candidate_sets",
    "dataset_stats",
    "detect_format",
    "load_candidates",
    "load_dataset",
    "make_synthetic",
    "read_native",
    "save_candidates",
    "synthetic_from_config",
    "validate_split",
    "write_native",
]
