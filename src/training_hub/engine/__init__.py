"""Our own PyTorch training engine (the ``native`` backend): one loop per file, small plain components.

Nothing is imported here: ``training_hub.engine.trainer`` imports torch and transformers when it is used.
"""
