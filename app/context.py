"""What every tab shares: settings, the one model, the background jobs."""
from __future__ import annotations

from dataclasses import dataclass, field

from app.jobs import HEAVY, HeavySlot, JobManager
from app.model_store import ModelStore
from app.settings import AppConfig


@dataclass
class AppContext:
    config: AppConfig = field(default_factory=AppConfig)
    models: ModelStore | None = None
    jobs: JobManager | None = None  # pipeline steps
    llm_jobs: JobManager | None = None  # role building (LLM API calls only)
    heavy: HeavySlot = HEAVY

    def __post_init__(self) -> None:
        if self.models is None:
            self.models = ModelStore(device=self.config.device, dtype=self.config.dtype)
        if self.jobs is None:
            self.jobs = JobManager(self.heavy)
        if self.llm_jobs is None:
            self.llm_jobs = JobManager(self.heavy)
