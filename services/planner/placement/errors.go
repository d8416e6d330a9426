package placement

import "errors"

// ErrInvalidProblem reports a Problem that cannot be planned as given
// (no layers, duplicate node IDs, a link to an unknown endpoint, ...).
var ErrInvalidProblem = errors.New("invalid problem")

// ErrInvalidPlacement reports a placement that names an unknown node or a
// layer range outside the model.
var ErrInvalidPlacement = errors.New("invalid placement")

// ErrInfeasible reports that no placement can serve the model: the eligible
// nodes cannot hold every layer between them.
var ErrInfeasible = errors.New("no feasible placement")

// ErrUnknownStrategy reports a strategy name that is not registered.
var ErrUnknownStrategy = errors.New("unknown strategy")
