package prices

import "errors"

var (
	// ErrInvalidBook means a price book does not parse or breaks a rule
	// (version 0, no currency, a negative price).
	ErrInvalidBook = errors.New("invalid price book")
	// ErrOverflow means a charge or earning does not fit in int64
	// micro-units: the event's counts are absurd.
	ErrOverflow = errors.New("price overflows int64 micro-units")
)
