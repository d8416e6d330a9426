// Package svc is what every service's main shares: read the configuration,
// set up logging and telemetry, connect to NATS, create the grid's streams
// and buckets, run until SIGINT or SIGTERM, and shut down in order.
package svc

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/telemetry"
)

// Main runs one service process. cfg is the service's Config (filled from
// the environment under prefix); run serves until its context ends.
func Main(name, prefix string, cfg any, run func(ctx context.Context, c *bus.Conn, log *slog.Logger) error) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: LogLevel()})).With("service", name)
	slog.SetDefault(log)
	if err := main(name, prefix, cfg, run, log); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

func main(name, prefix string, cfg any, run func(context.Context, *bus.Conn, *slog.Logger) error, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var nc config.NATS
	if err := config.Load(ctx, "", &nc); err != nil {
		return err
	}
	if err := config.Load(ctx, prefix, cfg); err != nil {
		return err
	}
	if nc.URL == "" {
		return fmt.Errorf("NATS_URL is not set (a service process needs a NATS system; `tessera run` starts everything in one process)")
	}
	shutdown, err := telemetry.Setup(ctx, "tessera-"+name)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdown(sctx)
	}()
	c, err := bus.Connect(ctx, nc, nil, "tessera-"+name)
	if err != nil {
		return err
	}
	defer c.Close()
	if nc.Bootstrap {
		bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = bus.Bootstrap(bctx, c.JS, nc.Replicas)
		cancel()
		if err != nil {
			return err
		}
	}
	log.Info("started", "nats", c.NC.ConnectedUrlRedacted())
	err = run(ctx, c, log)
	log.Info("stopped")
	return err
}

// LogLevel reads TESSERA_LOG_LEVEL (debug, info, warn, error; default info).
func LogLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("TESSERA_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}
