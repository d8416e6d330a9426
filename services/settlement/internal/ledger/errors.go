package ledger

import "errors"

// ErrConfig means the ledger's options are unusable (a bad database name,
// no address).
var ErrConfig = errors.New("invalid ledger configuration")
