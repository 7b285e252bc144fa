"""The pipeline: stages in order, run locally and resumably (later also rendered as an Argo Workflow)."""
