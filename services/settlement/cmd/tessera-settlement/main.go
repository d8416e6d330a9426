// Command tessera-settlement settles usage events from stream USAGE into
// ClickHouse, exactly once: configure, start, wait. Configuration: NATS_*
// (see pkg/config) and TESSERA_SETTLEMENT_* (see settlement.Config).
package main

import (
	"context"
	"log/slog"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/settlement"
)

func main() {
	var cfg settlement.Config
	svc.Main("settlement", settlement.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return settlement.Run(ctx, cfg, settlement.Deps{Bus: c, Log: log})
	})
}
