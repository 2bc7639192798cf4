package engine

import (
	"fmt"
	"math"
	"strconv"
)

// Connection-string parameters that set a fleet per deployment, as
// pgxpool's pool_* parameters set a pool: an operator puts them in
// DATABASE_URL. pgx keeps every key it does not know in RuntimeParams,
// which it would send to the server as settings; Install reads them there
// and removes them, as pgxpool.ParseConfig does with pool_max_conns.
const (
	ParamFleetSize   = "pgstagger_fleet_size"
	ParamFleetBudget = "pgstagger_fleet_budget"
	ParamFleetMember = "pgstagger_fleet_member"
)

// takeParams removes pgstagger's parameters from runtime and returns them
// (nil if there are none).
func takeParams(runtime map[string]string) map[string]string {
	var got map[string]string
	for _, k := range []string{ParamFleetSize, ParamFleetBudget, ParamFleetMember} {
		if v, ok := runtime[k]; ok {
			delete(runtime, k)
			if got == nil {
				got = make(map[string]string, 3)
			}
			got[k] = v
		}
	}
	return got
}

// setParams sets c's fleet from params, checking each; they win over the
// options.
func (c *Config) setParams(params map[string]string) error {
	if v, ok := params[ParamFleetSize]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return paramError(ParamFleetSize, v, "must be a whole number of processes, at least 1")
		}
		c.FleetSize = n
	}
	if v, ok := params[ParamFleetBudget]; ok {
		b, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(b) || math.IsInf(b, 0) || b <= 0 {
			return paramError(ParamFleetBudget, v, "must be a positive number of connections per second")
		}
		c.FleetBudget = b
	}
	if v, ok := params[ParamFleetMember]; ok {
		i, err := strconv.Atoi(v)
		if err != nil || i < 0 {
			return paramError(ParamFleetMember, v, "must be a whole number, at least 0")
		}
		c.FleetMember, c.FleetMemberSet = i, true
	}
	return nil
}

// withParams is c with params applied, checked as a whole.
func (c *Config) withParams(params map[string]string) (*Config, error) {
	m := *c
	if err := m.setParams(params); err != nil {
		return nil, err
	}
	name := func(param string, option string) string {
		if v, ok := params[param]; ok {
			return param + "=" + v
		}
		return option
	}
	switch {
	case m.FleetSize > 0 && m.FleetBudget == 0:
		return nil, fmt.Errorf("%w: %s without %s: a fleet needs a budget", ErrInvalidOption,
			name(ParamFleetSize, "WithFleet"), ParamFleetBudget)
	case m.FleetBudget > 0 && m.FleetSize == 0:
		return nil, fmt.Errorf("%w: %s without %s: a budget needs a fleet size", ErrInvalidOption,
			name(ParamFleetBudget, "WithFleet"), ParamFleetSize)
	case m.FleetMemberSet && m.FleetSize == 0:
		return nil, fmt.Errorf("%w: %s needs a fleet: set WithFleet or %s and %s", ErrInvalidOption,
			name(ParamFleetMember, fmt.Sprintf("WithFleetMember(%d)", m.FleetMember)), ParamFleetSize, ParamFleetBudget)
	case m.FleetMemberSet && m.FleetMember >= m.FleetSize:
		return nil, fmt.Errorf("%w: %s: the member index must be below the fleet size (%d)", ErrInvalidOption,
			name(ParamFleetMember, fmt.Sprintf("WithFleetMember(%d)", m.FleetMember)), m.FleetSize)
	}
	return &m, nil
}

func paramError(param, value, why string) error {
	return fmt.Errorf("%w: connection string parameter %s=%q: %s", ErrInvalidOption, param, value, why)
}
