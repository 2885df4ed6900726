"""The experiment side: offline models and data, evaluation, the main job and CLI, the side-by-side harness."""
