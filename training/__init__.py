"""From REES46 event logs (and tabular CSVs) to trained recsql artifacts."""
