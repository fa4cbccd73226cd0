"""python -m toolkit {train,evaluate,predict,compare,plot} ... (also: accelerate launch -m toolkit train ...)."""

from .commands import dispatch

dispatch()
