# The model file imports a module that is not installed.
# expect: model file raised ModuleNotFoundError: No module named 'not_an_installed_module'
# expect: {here}
import not_an_installed_module  # here
