// Package config loads service configuration from environment variables.
//
// Every service describes its settings as one struct whose fields carry
// `env:"NAME, default=VALUE"` tags; Load reads them under the service's
// prefix (for example TESSERA_ROUTER_), so that one environment can hold the
// settings of every service without collisions. Connection settings shared by
// all services (NATS_URL, NATS_CREDS, ...) are read without a prefix; see
// NATS.
package config

import (
	"context"
	"fmt"
	"reflect"
	"strings"

	"github.com/sethvargo/go-envconfig"
)

// Load fills target (a pointer to a struct) from the process environment,
// reading every variable under prefix.
func Load(ctx context.Context, prefix string, target any) error {
	return LoadFrom(ctx, prefix, target, envconfig.OsLookuper())
}

// LoadMap fills target from env instead of the process environment; tests
// and the all-in-one grid use it to configure services side by side.
func LoadMap(ctx context.Context, prefix string, target any, env map[string]string) error {
	return LoadFrom(ctx, prefix, target, envconfig.MapLookuper(env))
}

// LoadFrom fills target using lookup under prefix.
func LoadFrom(ctx context.Context, prefix string, target any, lookup envconfig.Lookuper) error {
	if prefix != "" {
		lookup = envconfig.PrefixLookuper(prefix, lookup)
	}
	if err := envconfig.ProcessWith(ctx, &envconfig.Config{Target: target, Lookuper: lookup}); err != nil {
		return fmt.Errorf("config %s: %w", variable(target, prefix, err), err)
	}
	return nil
}

// variable names the environment variable an envconfig error is about (its
// errors start with the struct field's name), or prefix* when none fits.
func variable(target any, prefix string, err error) string {
	field, _, _ := strings.Cut(err.Error(), ":")
	t := reflect.TypeOf(target)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t != nil && t.Kind() == reflect.Struct {
		if f, ok := t.FieldByName(field); ok {
			if key, _, _ := strings.Cut(f.Tag.Get("env"), ","); strings.TrimSpace(key) != "" {
				return prefix + strings.TrimSpace(key)
			}
		}
	}
	return prefix + "*"
}

// NATS holds how a service reaches the NATS system. It is read without a
// prefix so that one NATS_URL configures every service on a host.
type NATS struct {
	// URL is a comma-separated list of servers. Empty means: start an
	// embedded server (only the all-in-one grid and tests do this).
	URL string `env:"NATS_URL"`
	// Creds is a path to a .creds file (user JWT and nkey seed).
	Creds string `env:"NATS_CREDS"`
	// NKeySeed is a path to a file holding an nkey seed used to authenticate.
	NKeySeed string `env:"NATS_NKEY_SEED"`
	// User and Password authenticate with a plain user, for development only.
	User     string `env:"NATS_USER"`
	Password string `env:"NATS_PASSWORD"`
	// Replicas is the replica count for streams, buckets and the object
	// store this service creates (3 on a clustered NATS system).
	Replicas int `env:"NATS_REPLICAS, default=1"`
	// InboxPrefix replaces "_INBOX" as the prefix of the client's reply
	// subjects (request replies, JetStream acks, watchers). On a secured
	// system each identity may subscribe only under its own prefix, so that
	// no one reads another client's replies; deploy/ names the prefix of
	// each role (for example _INBOX_node-1 for executor node-1).
	InboxPrefix string `env:"NATS_INBOX_PREFIX"`
	// JSDomain is the JetStream domain of the grid, for clients that reach
	// it through a leaf node (a supplier site); empty on the grid itself.
	JSDomain string `env:"NATS_JS_DOMAIN"`
	// Bootstrap makes the service create or update the grid's streams,
	// buckets and object store at start. A secured grid sets it to false:
	// only the administrator's identity may change stream configuration,
	// and it bootstraps once at deploy time.
	Bootstrap bool `env:"NATS_BOOTSTRAP, default=true"`
}
