package spool

import "errors"

// Sentinel errors of the usage spool.
var (
	// ErrCorrupt means a spool line is not an event or a done mark (a torn
	// last line is not corruption: it is dropped).
	ErrCorrupt = errors.New("corrupt usage spool")
	// ErrClosed means the spool was used after Close.
	ErrClosed = errors.New("usage spool closed")
)
