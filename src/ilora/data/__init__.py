"""Datasets: the in-memory representation, readers, candidate sets."""

from ilora.data.dataset import SPLITS, Catalog, SeqDataset, Split, validate_split

__all__ = ["SPLITS", "Catalog", "SeqDataset", "Split", "validate_split"]
