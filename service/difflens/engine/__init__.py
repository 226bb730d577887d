"""Pure-torch explanation engine: loading, sampling loop, DF-RISE, DF-CAM, attention maps, schedules."""
