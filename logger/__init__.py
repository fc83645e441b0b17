from logger.logger import log_to_file, progress_bar, setup_logging
from logger.tensorboard import TensorboardWriter

__all__ = ["TensorboardWriter", "log_to_file", "progress_bar", "setup_logging"]
