"""The thin command line on top of the library (`ilora ...`)."""
