"""What serving adds around the model: settings, HTTP edges, pools and batching, jobs, telemetry."""
