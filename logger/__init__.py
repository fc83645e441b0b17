from logger.logger import FILE_ONLY, progress_bar, setup_logging
from logger.tensorboard import TensorboardWriter

__all__ = ["FILE_ONLY", "TensorboardWriter", "progress_bar", "setup_logging"]
