package settle

import "errors"

var (
	// ErrConfig means the Settler's configuration is unusable.
	ErrConfig = errors.New("invalid settlement configuration")
	// ErrDeliveryGap means an event that is still in the stream was skipped
	// by delivery; the session ends and delivery starts again from the
	// ledger's position.
	ErrDeliveryGap = errors.New("gap in usage delivery")
)
