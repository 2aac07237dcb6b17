"""Benchmarks of the Assistant Axis Lab (issue 6); run ``python -m bench <name> [--quick]``.

* ``extract``       response-token throughput of ``pipeline.extract`` vs a plain-HF forward-hook baseline
* ``steer``         tokens/s of capped chat generation (``steering.generation``) vs plain HF ``generate``
* ``memory``        peak RSS of loading + extracting, relative to the model's parameter bytes
* ``pipeline-cost`` wall time per pipeline step on a small run, projected to the paper's full run
* ``all``           every one of them, in that order

Each figure is a ratio against a baseline measured in the same run on the same inputs. Results go
to ``bench/results/<name>[-quick].json`` (not versioned); BENCHMARKS.md records the figures.
"""
