package helix

import "errors"

// ErrSyntax reports a malformed Helix file: a line, value or list that does
// not parse.
var ErrSyntax = errors.New("helix: syntax error")

// ErrUnknownModel reports a model name without embedded data.
var ErrUnknownModel = errors.New("helix: unknown model")

// ErrUnknownMachine reports a machine type without a profile or timing table.
var ErrUnknownMachine = errors.New("helix: unknown machine type")

// ErrOutOfRange reports a timing lookup outside the measured batch sizes
// (Helix does not extrapolate) or a layer count outside a machine's table.
var ErrOutOfRange = errors.New("helix: out of range")
