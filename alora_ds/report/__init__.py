"""What a run shows: metrics sinks and progress bars (`tracking`), the run summary and the rank
heatmaps (`summary`)."""
