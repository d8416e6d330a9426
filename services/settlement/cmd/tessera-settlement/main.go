// Command tessera-settlement runs the settlement service: usage events from
// stream USAGE into ClickHouse, exactly once. Configuration: NATS_* (see
// pkg/config) and TESSERA_SETTLEMENT_* (see settlement.Config).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/services/settlement"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "tessera-settlement:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	slog.SetDefault(log)

	var cfg settlement.Config
	if err := config.Load(ctx, settlement.EnvPrefix, &cfg); err != nil {
		return err
	}
	var natsCfg config.NATS
	if err := config.Load(ctx, "", &natsCfg); err != nil {
		return err
	}
	if natsCfg.URL == "" {
		return fmt.Errorf("NATS_URL is required (the all-in-one grid embeds a server; this binary does not)")
	}
	shutdown, err := telemetry.Setup(ctx, "settlement")
	if err != nil {
		return err
	}
	defer func() { _ = shutdown(context.Background()) }()

	conn, err := bus.Connect(ctx, natsCfg, nil, "settlement")
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := bus.Bootstrap(ctx, conn.JS, natsCfg.Replicas); err != nil {
		return err
	}
	return settlement.Run(ctx, cfg, settlement.Deps{Bus: conn, Log: log})
}
