"""The daemon's runtime. Importing it checks that the installed websockets is one it works with."""

from wsd.runtime.compat import require_websockets

require_websockets()
