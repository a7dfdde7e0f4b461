"""Running a job on Ray: the stages, the builder that turns a config into the Ray Data graph,
the driver (runner), the Ray session, image encoding, telemetry and worker-death reporting."""
