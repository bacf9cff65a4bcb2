import os
import warnings

warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings.*")
os.environ.setdefault("ODMT_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "odmt-features"))
