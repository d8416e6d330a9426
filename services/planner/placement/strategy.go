package placement

import (
	"context"
	"fmt"
	"strings"
)

// Strategy is a named way to place a model's layers on a fleet. Place
// returns a valid placement for p or an error; prev, when not nil, is the
// plan currently running, which a strategy may keep parts of to move fewer
// weights. Strategies are values without hidden state: the same inputs give
// the same placement.
type Strategy interface {
	// Name is the strategy's registered name.
	Name() string
	// Place plans p, optionally starting from prev.
	Place(ctx context.Context, p *Problem, prev *Placement) (*Placement, error)
}

// Strategies returns every registered strategy, the default first.
func Strategies() []Strategy {
	return []Strategy{Tessera{}, Petals{}, Exo{}}
}

// StrategyNames lists the registered names, the default first.
func StrategyNames() []string {
	var names []string
	for _, s := range Strategies() {
		names = append(names, s.Name())
	}
	return names
}

// StrategyByName returns the registered strategy called name ("" is the default).
func StrategyByName(name string) (Strategy, error) {
	if name == "" {
		name = TesseraName
	}
	for _, s := range Strategies() {
		if s.Name() == name {
			return s, nil
		}
	}
	return nil, fmt.Errorf("%w: %q (have %s)", ErrUnknownStrategy, name, strings.Join(StrategyNames(), ", "))
}
