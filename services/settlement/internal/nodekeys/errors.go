package nodekeys

import "errors"

// ErrUnknownNode means no key was ever registered for the node.
var ErrUnknownNode = errors.New("unknown node")
