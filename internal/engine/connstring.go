package engine

import (
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
)

// redactedError is an error text with the passwords blanked out; it
// matches ErrInvalidOption.
type redactedError struct{ msg string }

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return ErrInvalidOption }

// ConnStringError explains a connection string that did not parse, without
// any password it may carry: pgx redacts the connection string it quotes,
// but not every fragment its keyword/value parser quotes in the cause
// (`postgress://u:pw@h/db sslmode=disable`, misspelled, is quoted whole).
// The error returned has every password the string may carry blanked out,
// keeps no reference to err, and matches ErrInvalidOption.
func ConnStringError(connString string, err error) error {
	msg := err.Error()
	if pws := passwordsIn(connString); len(pws) > 0 {
		// One pass, longest candidate first where two match at one place.
		pairs := make([]string, 0, 2*len(pws))
		for _, pw := range pws {
			pairs = append(pairs, pw, "xxxxx")
		}
		msg = strings.NewReplacer(pairs...).Replace(msg)
	}
	return &redactedError{fmt.Sprintf("%v: connection string: %s", ErrInvalidOption, msg)}
}

var (
	// userinfoPassword finds a URL's password, also in a string too broken
	// to parse as a URL: what lies between user: and the @ after //.
	userinfoPassword = regexp.MustCompile(`//[^/@\s]*?:([^@\s]*)@`)
	// keywordPassword finds password=value, quoted or not.
	keywordPassword = regexp.MustCompile(`password\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)`)
)

// passwordsIn returns every text connString may carry as a password, raw
// and decoded, once each, longest first (so that a password containing
// another is blanked whole).
func passwordsIn(connString string) []string {
	var out []string
	add := func(raw string) {
		for _, s := range []string{raw, strings.Trim(raw, "'"), strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(strings.Trim(raw, "'"))} {
			if s != "" {
				out = append(out, s)
			}
			if dec, err := url.PathUnescape(s); err == nil && dec != "" {
				out = append(out, dec)
			}
		}
	}
	if u, err := url.Parse(connString); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok {
			add(pw)
		}
	}
	for _, m := range userinfoPassword.FindAllStringSubmatch(connString, -1) {
		add(m[1])
	}
	for _, m := range keywordPassword.FindAllStringSubmatch(connString, -1) {
		add(m[1])
	}
	slices.SortFunc(out, func(a, b string) int {
		if len(a) != len(b) {
			return len(b) - len(a)
		}
		return strings.Compare(a, b) // equal ones side by side, for Compact
	})
	return slices.Compact(out)
}
