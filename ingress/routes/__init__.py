"""One small APIRouter per endpoint family: parse, call a backend, render."""
