from logger.logger import setup_logging
from logger.tensorboard import TensorboardWriter

__all__ = ["TensorboardWriter", "setup_logging"]
