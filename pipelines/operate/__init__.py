"""After a release: the canary's rollout steps, rollbacks, drift monitoring and the FinOps
report. Built on `pipelines.release`; nothing below imports this package."""
