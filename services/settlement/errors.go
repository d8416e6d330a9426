package settlement

import (
	"github.com/tessera-grid/tessera/services/settlement/internal/nodekeys"
	"github.com/tessera-grid/tessera/services/settlement/internal/settle"
)

var (
	// ErrUnknownNode means no public key was ever registered for a node; a
	// KeyResolver wraps it, and the node's events are dead-lettered.
	ErrUnknownNode = nodekeys.ErrUnknownNode
	// ErrConfig means settlement's configuration or dependencies are
	// unusable.
	ErrConfig = settle.ErrConfig
)
