"""pop3-connector: POP3 mailboxes into Exchange over SMTP, with dead letters."""

__version__ = "0.1.0"
