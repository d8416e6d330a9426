package plancli

import "errors"

// ErrUsage reports bad command-line arguments (missing or unknown flags).
var ErrUsage = errors.New("usage")
