"""Backend adapters. Each module keeps its heavy imports inside ``execute_training``."""
