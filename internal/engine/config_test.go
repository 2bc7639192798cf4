package engine

import (
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestDialsPerConnect(t *testing.T) {
	for mode, want := range map[string]int{"disable": 1, "require": 1, "prefer": 2, "allow": 2} {
		cfg, err := pgx.ParseConfig("postgres://u@127.0.0.1:5432/x?sslmode=" + mode)
		if err != nil {
			t.Fatal(err)
		}
		if got := DialsPerConnect(&cfg.Config); got != want {
			t.Errorf("sslmode=%s: dials per connect = %d, want %d", mode, got, want)
		}
	}
}

func TestParseConfigHidesPassword(t *testing.T) {
	for _, connString := range []string{
		"postgres://u:s3cretpw@127.0.0.1:notaport/x",
		// pgx's keyword/value parser quotes this whole in its cause.
		"postgress://u:s3cretpw@h/db sslmode=disable",
		"//:s3cretpw@# 0=", // found by FuzzNew
		"postgress://u:s3cret%20pw@h/db sslmode=disable",
		"host=h password='s3cret pw' port=x",
		"host=h password=s3cretpw port=x",
		"host=h password='s3cret\\' pw",
	} {
		for name, parse := range map[string]func(string) error{
			"pgx.ParseConfig":     func(s string) error { _, err := pgx.ParseConfig(s); return ConnStringError(s, err) },
			"pgxpool.ParseConfig": func(s string) error { _, err := pgxpool.ParseConfig(s); return ConnStringError(s, err) },
		} {
			err := parse(connString)
			if !errors.Is(err, ErrInvalidOption) || Classify(err) != Permanent {
				t.Fatalf("%s(%q): err = %v, want a permanent ErrInvalidOption", name, connString, err)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("%s(%q): error leaks the password: %v", name, connString, err)
			}
		}
	}
}
