"""U-MRG-format samples: reading (datasets folders, parquet, plain folders), writing, building."""

from medreasoner.data.builders import samples_from_2d, samples_from_volumes
from medreasoner.data.parquet import write_parquet
from medreasoner.data.samples import Sample, iter_samples, load_samples

__all__ = ["Sample", "iter_samples", "load_samples", "samples_from_2d", "samples_from_volumes", "write_parquet"]
