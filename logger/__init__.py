from logger.logger import progress_bar, setup_logging
from logger.tensorboard import TensorboardWriter

__all__ = ["TensorboardWriter", "progress_bar", "setup_logging"]
