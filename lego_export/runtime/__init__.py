"""The LEGO runtime: backends, brick schedules, sampler and the pipeline. Needs no torch.

from lego_export.runtime import LegoPipeline
images = LegoPipeline.from_engines("engines/")(num=8, steps=50, skip="late").images
"""

from lego_export.runtime.pipeline import LegoPipeline, SampleResult, Timing

__all__ = ["LegoPipeline", "SampleResult", "Timing"]
