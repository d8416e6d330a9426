package customers

import "errors"

// ErrBadRequest means a customer's consumer request is invalid.
var ErrBadRequest = errors.New("bad consumer request")
